"""Typed run configuration: dataclass defaults <- YAML files <- `key=value` overrides.

dtrain/config/yamlfile.py reads the files (plain values only, duplicate keys refused),
dtrain/config/typed.py checks each value against its field's type as it merges, and
`validate` adds the range and choice checks that types cannot express. Every
failure is a one-line `ConfigError` naming the key, the value and what is
allowed. Nothing here imports torch: the command line answers before it loads.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from dtrain.config import typed, yamlfile
from dtrain.errors import ConfigError, DTrainError
from dtrain.config.typed import MISSING

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip", "ignore")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")
GRAD_COMPRESSIONS = ("none", "bf16", "fp16")
CATCHABLE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT", "SIGXCPU")
# Kept here, not imported from dtrain.loop.task/models, so that loading a config imports no torch.
LOSSES = ("cross_entropy", "mse", "l1", "smooth_l1", "bce_with_logits")
METRICS = ("accuracy", "mae")
MODEL_INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


@dataclass
class DataConfig:
    name: str = "digits"
    """Dataset: digits (bundled with scikit-learn), synthetic, mnist, fashion_mnist, cifar10, or a user factory
    'package.module:function' returning (train_dataset, eval_dataset) or a dtrain.Datasets. The factory is
    called with those of root, seed, download it names, plus data.kwargs, on every rank (with
    data.download=true, first on rank 0 and on each node's first rank, then on the others)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a user data factory, e.g. {size: 5000}."""
    input_key: str = "input"
    """Where the inputs are in a batch that is a dict (a pair is always (inputs, targets))."""
    target_key: str = "target"
    """Where the targets are in a batch that is a dict."""
    root: str = "data"
    """Directory holding the torchvision datasets' files."""
    download: bool = False
    """Let torchvision download missing files (needs internet): rank 0 first, then the first rank of each
    other node fetches what its node lacks, so node-local and shared data.root both work."""
    batch_size: int = 32
    """Samples per process per micro-step; the global batch is this x grad_accum_steps x world_size."""
    eval_batch_size: int = 256
    """Samples per process per eval batch."""
    num_workers: int = 0
    """DataLoader worker processes per rank (unused on the fast path, which needs none)."""
    fast_path: bool = True
    """Data held in tensors (digits, synthetic, a user TensorDataset or a Subset of one, or a dataset with
    get_batch(indices); see dtrain/data/batches.py) is batched by one index_select per batch instead of a
    DataLoader's per-sample __getitem__ and collate: the same batches bit for bit, in the sampler's order, at
    a fraction of the host time (it matters for small models, whose step is short). Anything else (transforms,
    images decoded per sample, dicts) always takes the DataLoader. false: always the DataLoader."""
    device_resident: bool = False
    """Fast path only: copy the whole data set to the GPU once, so batches are taken there and no step waits on
    a host-to-device copy. Helps when the data fits in GPU memory next to the model; on CPU it changes nothing
    (the data is already where the model is). Needs a TensorDataset (or a Subset of one) and fast_path=true."""
    train_size: int = 1000
    """synthetic only: number of training samples."""
    eval_size: int = 200
    """synthetic only: number of eval samples."""
    num_features: int = 32
    """synthetic only: input width."""
    num_classes: int = 10
    """synthetic only: number of classes."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    """mlp | cnn | a user factory 'package.module:function', e.g. torchvision.models:resnet18. It is called
    with those of input_shape and num_classes it names (num_classes is the number of outputs: the classes,
    or a regression target's width), plus model.kwargs."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a model factory, e.g. {num_classes: 10}; always passed, and they win."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    """mlp only: hidden layer widths."""
    init: str = "default"
    """default (the layers' own) | xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal: applied
    to every Linear and Conv weight, their biases set to zero; identical on every rank."""
    freeze: list[str] = field(default_factory=list)
    """Globs over parameter names: matched parameters get requires_grad=False and stay out of the optimizer."""


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    """cross_entropy | mse | l1 | smooth_l1 | bce_with_logits | a function 'package.module:function' of
    (outputs, targets) returning one loss per sample (shape [batch]); see dtrain/loop/task.py."""
    metrics: list[str] = field(default_factory=list)
    """Extra eval metrics: accuracy | mae | 'package.module:function' of (outputs, targets) returning one
    value per sample; each is logged as its mean over the eval set. cross_entropy and bce_with_logits
    report accuracy, mse reports mae, without being asked."""


@dataclass
class ParamGroupConfig:
    params: str = MISSING
    """Glob over parameter names (as in model.named_parameters()), e.g. '0.*' or '*.bias'."""
    lr: Optional[float] = None
    """Learning rate of the group; unset means optim.lr."""
    weight_decay: Optional[float] = None
    """Weight decay of the group; unset means optim.weight_decay."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd | adam | adamw."""
    lr: float = 0.05
    momentum: float = 0.9
    """sgd only."""
    dampening: float = 0.0
    """sgd only."""
    nesterov: bool = False
    """sgd only; needs momentum > 0 and dampening == 0."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adam/adamw only."""
    eps: float = 1e-8
    """adam/adamw only."""
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    """Per-layer settings; parameters matched by no group use the top-level values."""
    no_decay_bias_norm: bool = False
    """No weight decay on biases and normalisation weights (parameters with fewer than 2 dims)."""


@dataclass
class SchedConfig:
    name: str = "constant"
    """constant | step | cosine | linear; all count optimizer steps."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to the base lr over this many optimizer steps."""
    step_size: int = 100
    """step only: multiply the lr by gamma every step_size optimizer steps."""
    gamma: float = 0.1
    """step only."""
    min_lr: float = 0.0
    """cosine and linear: the lr reached at the last step."""


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (across epochs); unset means run all epochs."""
    seed: int = 0
    """Seeds the weights, the data order and the synthetic data."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step (K)."""
    grad_clip: Optional[float] = None
    """Clip the global gradient L2 norm to this value; unset means no clipping."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    save_model: bool = True
    """Rank 0 writes the trained weights (the unwrapped model's state_dict) to <output_dir>/model.pt."""
    on_nonfinite: str = "stop"
    """What a non-finite loss or gradient does. stop: every rank stops at the next logging step or checkpoint
    with one line naming the first non-finite step, exit 2, writing no weights (the last checkpoint stays);
    it watches each rank's loss (and the gradient norm when train.grad_clip computes one), so a gradient that
    goes bad under a finite loss is named at the next step, whose loss its update poisoned. skip: a step whose
    all-reduced gradient (the same on every rank) is not finite is undone on the device: parameters and
    optimizer state as before, the schedule still advances; counted in skipped_steps. ignore: train on.
    Flags stay on the device until a check (logging steps, checkpoints, the end): no per-step host sync.
    With fp16 only the loss is watched (GradScaler skips gradient overflows)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: stop (as stop does, with the weights of before the skips) once this many steps
    in a row were skipped."""
    compile: bool = False
    """torch.compile the model (inductor; on CPU it needs a C++ compiler). Pays off for long runs of models
    whose step is many small kernels (fused on GPU, vectorised on CPU); the first steps and the first batch of
    a new size (the short last one, eval's) compile instead, reported as compile_s and compiles in the train
    records and left out of step_time_s. Losses match eager up to float rounding."""


@dataclass
class DistConfig:
    """One process is not wrapped in DDP at all (dtrain/parallel/ddp.py): the DDP knobs below apply from 2 processes."""

    backend: str = "auto"
    """auto (nccl with CUDA, gloo otherwise) | nccl | gloo."""
    timeout_s: int = 600
    """Step timeout: how long a collective waits for the other ranks once training runs. A rank
    that stalls or hangs longer fails the job, and the message names the ranks that were behind.
    Raise it only if a step, an eval or a checkpoint save can really take that long."""
    start_timeout_s: int = 300
    """Start-up timeout: how long the ranks wait for each other to arrive (every process started,
    MASTER_ADDR:MASTER_PORT reachable) before the job fails naming the ranks that did not come."""
    bucket_cap_mb: Optional[float] = None
    """DDP gradient bucket size in MiB; unset: DDP's default, 25 (with NCCL, a first bucket of 1 MiB to start
    communicating early; with gloo every bucket is 25, as each gloo collective has a high fixed cost). Larger
    buckets mean fewer, bigger all-reduces (helps where each collective has a high fixed cost: gloo, slow links,
    many small parameters); smaller ones start communicating earlier in the backward pass (more overlap on
    fast links)."""
    static_graph: bool = False
    """Promise DDP that every step uses the same parameters in the same order (no data-dependent branches):
    after the first step it orders its buckets by when gradients are really ready and skips per-step
    bookkeeping. Helps models whose gradients arrive in another order than their parameters are declared; it
    also makes find_unused_parameters cheap. Wrong for models that skip layers depending on the input."""
    grad_compression: str = "none"
    """none | bf16 | fp16: all-reduce gradients in 16 bits (DDP's built-in compression hooks) and cast them
    back, halving the bytes sent. Helps when the all-reduce is bandwidth-bound (large models, slow links,
    gloo over TCP); costs two casts per bucket and rounds each gradient to 8 (bf16) or 11 (fp16) significant
    bits. fp16 keeps more digits but overflows above 65504 (after dividing by the world size); bf16 never
    overflows. Both work on gloo and NCCL."""
    find_unused_parameters: bool = False
    """Let DDP find parameters that get no gradient in a step (a branch not taken, an unused head), which
    DDP otherwise waits on forever (an error at the next step). Needed only for such models; it costs a walk
    of the autograd graph every step (much less with static_graph=true). Frozen parameters (model.freeze)
    need no flag."""


@dataclass
class LogConfig:
    every_steps: int = 10
    """Log the train loss averaged over this many optimizer steps."""
    wandb: bool = False
    project: Optional[str] = None
    """W&B project; unset leaves it to WANDB_PROJECT or W&B's default."""
    entity: Optional[str] = None
    run_name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    tensorboard: bool = False
    """Write TensorBoard event files under <output_dir>/tensorboard/."""
    progress: str = "auto"
    """auto (a bar when stdout is a terminal, lines otherwise) | bar | lines | none."""


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    """Save every this many optimizer steps; unset: only at the end and on preemption."""
    every_minutes: Optional[float] = None
    """Save when this much wall time has passed since the last save (rank 0's clock decides for all)."""
    keep: int = 2
    """How many committed checkpoints stay under <output_dir>/checkpoints/; older ones are deleted after a
    newer one is committed."""
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    """Signals that mean "save and stop" (Slurm's time limit and --signal, a preemption): every rank saves
    the same step and exits 0, whichever ranks received it."""
    stop_grace_s: float = 20.0
    """After a stop signal, how long a rank waits to reach the step boundary where every rank saves; past
    that (a peer died, and torchrun is stopping the survivors; or one step is slower than this) it stops
    without a checkpoint, closing its loggers, before the launcher's SIGKILL (about 30 s after its signal)."""
    requeue: bool = True
    """Under Slurm, after a signal's checkpoint, rank 0 requeues the job (`scontrol requeue`) when the job
    allows it (sbatch --requeue); the requeued job resumes by itself."""


@dataclass
class LRFindConfig:
    start_lr: float = 1e-5
    end_lr: float = 10.0
    num_steps: int = 100
    smoothing: float = 0.05
    """Weight of the newest loss in the exponential moving average."""
    diverge_factor: float = 4.0
    """Stop once the smoothed loss exceeds this multiple of the best one."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = ""
    """Where rank 0 writes config.yaml, metrics.jsonl, model.pt, checkpoints/ and logger files. Unset: a new
    runs/<date>-<time> for every run, so two runs never collide; set it (the Slurm scripts use the job id)
    to make a rerun of the same command resume."""
    overwrite: bool = False
    """Start over in an output_dir that already holds a run: its outputs and checkpoints are removed first."""
    resume: str = "auto"
    """auto: continue from the newest committed checkpoint in output_dir if there is one (a finished run is
    reported and left alone) | never | the path of a checkpoint directory to continue from."""


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over all ranks: what a resume on another world size must keep."""
    return cfg.data.batch_size * cfg.train.grad_accum_steps * world_size


class ConfigFileError(ConfigError):
    """A config file that cannot be read as a mapping of plain values; the same on every rank."""

    def __init__(self, path: str, problem: str, line: Optional[int] = None) -> None:
        at = f" line {line}" if line else ""
        super().__init__("", path, problem, f"config file '{path}'{at}: {problem}")


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file ({} when it is empty); one-line errors for anything else."""
    try:
        tree = yamlfile.read(path)
    except FileNotFoundError:
        # Not a ConfigFileError: another node may lack a file that rank 0 has, so every rank says it.
        raise DTrainError(f"config file '{path}' not found") from None
    except IsADirectoryError:
        raise ConfigFileError(path, "a directory; allowed: a YAML file") from None
    except OSError as exc:
        raise DTrainError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    except yamlfile.YamlProblem as exc:
        raise ConfigFileError(path, exc.problem, exc.line) from None
    if tree is None:
        return {}  # empty, or only comments: no values
    if not isinstance(tree, dict):
        kind = "a list" if isinstance(tree, list) else f"the single value {typed.show(tree)}"
        raise ConfigFileError(path, f"holds {kind}; allowed: a mapping of sections and keys, e.g. "
                              "'train: {epochs: 3}'")
    # A run's config.yaml records the launch that happened (world size, precision...) under runtime:.
    # It describes, it does not configure, so the file can be fed back as it is.
    tree.pop("runtime", None)
    return tree


def load_config(config_file: Union[str, "os.PathLike[str]", Sequence[str], None] = None,
                overrides: Sequence[str] = (), base_config: Optional[Config] = None) -> Config:
    """Build the run's config: defaults (or `base_config`) <- YAML files, in order <- overrides, in order
    (a key given twice: the later wins); DTrainError on bad input. Imports no torch."""
    if config_file is None:
        files: list[str] = []
    elif isinstance(config_file, (str, os.PathLike)):
        files = [os.fspath(config_file)]
    else:
        files = [os.fspath(f) for f in config_file]
    if base_config is not None:
        cfg = copy.deepcopy(base_config)
        typed.check(cfg)  # built in Python: no file or parser has typed it
    else:
        cfg = Config()
    origins: dict[str, str] = {}  # key -> where a file set it, for the range checks' messages
    for path in files:
        path = os.path.expanduser(path)
        typed.merge(cfg, read_config_file(path), "", origins, path)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            hint = f"; for a YAML file, --config {item}" if item.endswith((".yaml", ".yml")) else ""
            raise ConfigError(key, None, "", f"config key '{key}' has no value; allowed: key=value overrides, "
                              f"e.g. train.epochs=3{hint}")
        typed.set_override(cfg, key.strip(), text, origins)
    _expand_paths(cfg)
    try:
        validate(cfg)
    except ConfigError as exc:
        where = origins.get(exc.key.split("[")[0], "")
        if where:
            raise ConfigError(exc.key, exc.value, exc.allowed, f"{exc} ({where})") from None
        raise
    return cfg


def _expand_paths(cfg: Config) -> None:
    """`~` in a path means the home directory wherever it is written (file, command line, API)."""
    cfg.data.root = os.path.expanduser(cfg.data.root)
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    if cfg.resume not in ("auto", "never"):
        cfg.resume = os.path.expanduser(cfg.resume)


def to_dict(cfg: Config, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Plain nested dicts and lists, e.g. for W&B's run config; `extra` adds top-level sections."""
    return {**dataclasses.asdict(cfg), **(extra or {})}


def to_yaml(cfg: Config, extra: Optional[dict[str, Any]] = None) -> str:
    """What `load_config` reads back as the same config (a `runtime:` section in `extra` is ignored there)."""
    return yamlfile.dump(to_dict(cfg, extra))


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    _check(value in choices, key, value, " | ".join(choices))


def validate(cfg: Config) -> None:
    """Range and choice checks. Raises ConfigError; never uses assert (stripped by -O)."""
    d, m, o, s, t, lg = cfg.data, cfg.model, cfg.optim, cfg.sched, cfg.train, cfg.log
    _check(d.name in DATASETS or ":" in d.name, "data.name", d.name,
           f"{' | '.join(DATASETS)} | a factory 'package.module:function'")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _check(d.train_size >= 1, "data.train_size", d.train_size, "an integer >= 1")
    _check(d.eval_size >= 1, "data.eval_size", d.eval_size, "an integer >= 1")
    _check(d.num_features >= 1, "data.num_features", d.num_features, "an integer >= 1")
    _check(d.num_classes >= 2, "data.num_classes", d.num_classes, "an integer >= 2")
    _check(d.fast_path or not d.device_resident, "data.device_resident", d.device_resident,
           "false with data.fast_path=false (device-resident data is read by the fast path)")

    _check(m.name in ("mlp", "cnn") or ":" in m.name, "model.name", m.name,
           "mlp | cnn | a factory 'package.module:function'")
    _check(all(h >= 1 for h in m.hidden), "model.hidden", m.hidden, "a list of integers >= 1")
    _choice("model.init", m.init, MODEL_INITS)
    _check(all(bool(g) for g in m.freeze), "model.freeze", m.freeze, "a list of non-empty globs")
    _check(cfg.loss.name in LOSSES or ":" in cfg.loss.name, "loss.name", cfg.loss.name,
           f"{' | '.join(LOSSES)} | a function 'package.module:function'")
    for i, metric in enumerate(cfg.loss.metrics):
        _check(metric in METRICS or ":" in metric, f"loss.metrics[{i}]", metric,
               f"{' | '.join(METRICS)} | a function 'package.module:function'")

    _choice("optim.name", o.name, OPTIMIZERS)
    # A setting the chosen optimizer ignores is almost always a mistake (e.g.
    # momentum=0.95 left over after switching to adam); refuse it rather than
    # train with something other than what the config says.
    defaults = OptimConfig()
    other_keys = ("momentum", "dampening", "nesterov") if o.name != "sgd" else ("betas", "eps")
    applies_to = "sgd only" if o.name != "sgd" else "adam and adamw only"
    for name in other_keys:
        value, default = getattr(o, name), getattr(defaults, name)
        _check(value == default, f"optim.{name}", value,
               f"the default {default!r} with optim.name={o.name} (optim.{name} applies to {applies_to})")
    _check(o.lr >= 0, "optim.lr", o.lr, "a number >= 0")
    _check(o.momentum >= 0, "optim.momentum", o.momentum, "a number >= 0")
    _check(0 <= o.dampening <= 1, "optim.dampening", o.dampening, "a number in [0, 1]")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    if o.nesterov:
        _check(o.momentum > 0 and o.dampening == 0, "optim.nesterov", o.nesterov,
               "true only with optim.momentum > 0 and optim.dampening = 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    seen: dict[str, int] = {}
    for i, g in enumerate(o.param_groups):
        key = f"optim.param_groups[{i}]"
        _check(bool(g.params), f"{key}.params", g.params, "a non-empty glob over parameter names")
        # Identical globs always overlap; caught here, before any process starts.
        _check(g.params not in seen, f"{key}.params", g.params,
               f"a glob different from optim.param_groups[{seen.get(g.params)}].params")
        seen[g.params] = i
        _check(g.lr is None or g.lr >= 0, f"{key}.lr", g.lr, "a number >= 0")
        _check(g.weight_decay is None or g.weight_decay >= 0, f"{key}.weight_decay",
               g.weight_decay, "a number >= 0")

    _choice("sched.name", s.name, SCHEDULES)
    _check(s.warmup_steps >= 0, "sched.warmup_steps", s.warmup_steps, "an integer >= 0")
    _check(s.step_size >= 1, "sched.step_size", s.step_size, "an integer >= 1")
    _check(0 < s.gamma <= 1, "sched.gamma", s.gamma, "a number in (0, 1]")
    _check(0 <= s.min_lr <= o.lr, "sched.min_lr", s.min_lr, f"a number in [0, optim.lr={o.lr}]")

    _check(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps,
           "an integer >= 1, or null for no limit")
    _choice("train.precision", t.precision, PRECISIONS)
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    _check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip,
           "a number > 0, or null for no clipping")
    _choice("train.device", t.device, DEVICES)
    _choice("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    _check(t.max_skipped_steps >= 1, "train.max_skipped_steps", t.max_skipped_steps, "an integer >= 1")

    _choice("dist.backend", cfg.dist.backend, BACKENDS)
    _check(cfg.dist.timeout_s >= 1, "dist.timeout_s", cfg.dist.timeout_s, "an integer >= 1")
    _check(cfg.dist.start_timeout_s >= 1, "dist.start_timeout_s", cfg.dist.start_timeout_s, "an integer >= 1")
    _check(cfg.dist.bucket_cap_mb is None or (cfg.dist.bucket_cap_mb > 0 and math.isfinite(cfg.dist.bucket_cap_mb)),
           "dist.bucket_cap_mb", cfg.dist.bucket_cap_mb, "a number of MiB > 0, or null for DDP's default (25)")
    _choice("dist.grad_compression", cfg.dist.grad_compression, GRAD_COMPRESSIONS)

    _check(lg.every_steps >= 1, "log.every_steps", lg.every_steps, "an integer >= 1")
    _choice("log.progress", lg.progress, ("auto", "bar", "lines", "none"))

    f = cfg.lr_find
    _check(f.start_lr > 0, "lr_find.start_lr", f.start_lr, "a number > 0")
    _check(f.end_lr > f.start_lr, "lr_find.end_lr", f.end_lr, f"a number > lr_find.start_lr={f.start_lr}")
    _check(f.num_steps >= 2, "lr_find.num_steps", f.num_steps, "an integer >= 2")
    _check(0 < f.smoothing <= 1, "lr_find.smoothing", f.smoothing, "a number in (0, 1]")
    _check(f.diverge_factor > 1, "lr_find.diverge_factor", f.diverge_factor, "a number > 1")

    c = cfg.checkpoint
    _check(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", c.every_steps,
           "an integer >= 1, or null for only at the end and on signals")
    _check(c.every_minutes is None or (c.every_minutes > 0 and math.isfinite(c.every_minutes)),
           "checkpoint.every_minutes", c.every_minutes, "a number > 0, or null")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "an integer >= 1")
    _check(c.stop_grace_s > 0 and math.isfinite(c.stop_grace_s), "checkpoint.stop_grace_s", c.stop_grace_s,
           "a number of seconds > 0")
    for i, name in enumerate(c.signals):
        _check(name in CATCHABLE_SIGNALS, f"checkpoint.signals[{i}]", name, " | ".join(CATCHABLE_SIGNALS))
    _check(bool(cfg.resume), "resume", cfg.resume, "auto | never | the path of a checkpoint")



# Keys a resumed run may change: they leave its math as it was. Every other key must equal the
# checkpoint's; the per-process batch and accumulation may change only with the same global batch.
RESUME_FREE = ("data.root", "data.download", "data.num_workers", "data.eval_batch_size", "data.batch_size",
               "data.fast_path", "data.device_resident",
               "train.grad_accum_steps", "train.device", "train.save_model", "train.on_nonfinite",
               "train.max_skipped_steps", "dist.", "log.", "lr_find.",
               "checkpoint.", "output_dir", "overwrite", "resume")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key (checkpoint value -> this value)' for every key that changes the math of a resumed run."""
    a, b = _flatten({k: v for k, v in saved.items() if k != "runtime"}), _flatten(current)
    changed = [k for k in sorted(set(a) | set(b))
               if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE) and a.get(k) != b.get(k)]
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed]
