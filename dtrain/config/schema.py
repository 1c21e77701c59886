"""The run's configuration as dataclasses: every key, its default, and what it does (the field docstrings are
the reference). Loading it is dtrain/config/load.py; its range and choice checks, validate.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from dtrain.config.typed import MISSING


@dataclass
class DataConfig:
    """The data set, how it is batched, and the synthetic data's shape."""

    name: str = "digits"
    """Dataset: digits (bundled with scikit-learn), synthetic, mnist, fashion_mnist, cifar10, or a user factory
    'package.module:function' returning (train_dataset, eval_dataset) or a dtrain.Datasets. The factory is
    called with those of root, seed, download it names, plus data.kwargs, on every rank (with
    data.download=true, first on rank 0 and on each node's first rank, then on the others)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a user data factory, e.g. {size: 5000}."""
    input_key: str = "input"
    """Where the inputs are in a batch that is a dict (a pair is always (inputs, targets)). '*': every entry
    but data.target_key goes to the model as a keyword argument (model(**inputs): input_ids, attention_mask,
    ... for a Hugging Face model; the targets are not passed, so the model does not compute a loss of its
    own)."""
    target_key: str = "target"
    """Where the targets are in a batch that is a dict."""
    root: str = "data"
    """Directory holding the torchvision datasets' files."""
    download: bool = False
    """Let torchvision download missing files (needs internet): rank 0 first, then the first rank of each
    other node fetches what its node lacks, so node-local and shared data.root both work. data.name=tokens:
    fetch tiny Shakespeare into data.path when its train file is missing (the same way)."""
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
    path: str = "data/shakespeare_char"
    """tokens only: a folder in nanoGPT's layout: train.bin and val.bin (or train.npy and val.npy) of token ids,
    and an optional meta.pkl whose vocab_size is the vocabulary (else the largest id + 1). With
    data.download=true and no train file there, rank 0 writes tiny Shakespeare into it, encoded as characters."""
    block_size: int = 64
    """tokens only: tokens per window; a sample is a window x and its targets y, the same tokens shifted by one."""
    sampling: str = "random"
    """tokens only: random (each step draws its windows at random offsets, a function of train.seed, the epoch,
    the step and the window's place in the global batch: nanoGPT's sampler, the same windows at any number of
    processes; an epoch is as many steps as cover (tokens - 1) // block_size windows) | strided (epochs of the
    non-overlapping windows, shuffled, as any other data set)."""
    token_dtype: str = "uint16"
    """tokens only: the integer type of the ids in a .bin file (a .npy file says its own): uint16 | uint32."""


@dataclass
class ModelConfig:
    """The model: a built-in or a factory, its initialisation, and which parameters train."""

    name: str = "mlp"
    """mlp | cnn | gpt | a user factory 'package.module:function', e.g. torchvision.models:resnet18. It is
    called with those of input_shape and num_classes it names (num_classes is the number of outputs: the
    classes, or a regression target's width), plus model.kwargs. gpt: a decoder-only transformer for token data
    (dtrain/models/gpt.py), its window length from the data's block size and its vocabulary from the data;
    model.kwargs n_layer (4), n_head (4), n_embd (128), dropout (0.0), bias (true), block_size (the data's)."""
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
    """The training loss and the extra eval metrics."""

    name: str = "cross_entropy"
    """cross_entropy | causal_lm | mse | l1 | smooth_l1 | bce_with_logits | a function
    'package.module:function' of (outputs, targets) returning one loss per sample (shape [batch]), or a pair
    (values, weights) of them: the loss is then the global sum of the values over the global sum of the
    weights (see dtrain/loop/task.py). cross_entropy and causal_lm are token-weighted: the mean over every
    real target of the global batch (targets [batch, time] for logits [batch, time, vocab] or [batch, vocab,
    time]). causal_lm: next-token cross-entropy of logits [batch, time, vocab] against labels [batch, time]
    shifted by one inside the loss (Hugging Face's convention: the labels are the input ids)."""
    ignore_index: int = -100
    """cross_entropy, causal_lm and accuracy: targets equal to this are padding and count nowhere (not in the
    loss, the gradient or the token count). With one class label per sample (classification), cross_entropy
    keeps the plain per-sample mean: a sample labelled this adds a loss of 0 and still counts."""
    metrics: list[str] = field(default_factory=list)
    """Extra eval metrics: accuracy | mae | 'package.module:function' of (outputs, targets) returning one
    value per sample; each is logged as its mean over the eval set. cross_entropy and bce_with_logits
    report accuracy, mse reports mae, without being asked."""


@dataclass
class ParamGroupConfig:
    """One entry of optim.param_groups."""

    params: str = MISSING
    """Glob over parameter names (as in model.named_parameters()), e.g. '0.*' or '*.bias'."""
    lr: Optional[float] = None
    """Learning rate of the group; unset means optim.lr."""
    weight_decay: Optional[float] = None
    """Weight decay of the group; unset means optim.weight_decay."""


@dataclass
class OptimConfig:
    """The optimizer, and per-layer settings by parameter-name globs."""

    name: str = "sgd"
    """sgd | adam | adamw."""
    lr: float = 0.05
    """Learning rate (the schedule's peak); parameters matched by no group, or by a group without its own lr,
    use it."""
    momentum: float = 0.9
    """sgd only."""
    dampening: float = 0.0
    """sgd only."""
    nesterov: bool = False
    """sgd only; needs momentum > 0 and dampening == 0."""
    weight_decay: float = 0.0
    """Weight decay, as torch's optimizer applies it (decoupled for adamw, added to the gradient for sgd and
    adam); parameters matched by no group, or by a group without its own, use it."""
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
    """The learning-rate schedule, counted in optimizer steps."""

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
    """How long and how each step trains: steps, seed, precision, accumulation, clipping, device."""

    epochs: int = 20
    """Passes over the training set; train.max_steps may stop the run earlier."""
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
    """How the processes work together: backend, strategy, timeouts, and DDP's knobs, which apply from 2
    processes (one process is not wrapped in DDP at all: dtrain/parallel/single.py)."""

    backend: str = "auto"
    """auto (nccl with CUDA, gloo otherwise) | nccl | gloo."""
    strategy: str = "ddp"
    """How 2 or more processes share the model. ddp: every rank holds the whole model, its gradients and
    optimizer state (with Adam 16 bytes per parameter per rank); the gradients are averaged over the ranks.
    fsdp2: PyTorch's fully_shard; each rank holds 1/W of the parameters, gradients and optimizer state, and
    gathers one shard unit (dist.shard) at a time for its forward and backward: for models whose DDP footprint
    does not fit one device, at the cost of more communication (every forward gathers the weights). Checkpoints
    are then sharded (each rank writes its own part) and resume at another world size or under the other
    strategy. One process is never wrapped (fsdp2 at one process says so once and trains unsharded)."""
    shard: list[str] = field(default_factory=lambda: ["auto"])
    """fsdp2: which submodules are shard units, each gathered on its own (the rest belongs to the root unit).
    [auto]: the children of every nn.ModuleList in the model (a transformer's blocks); or class-name globs,
    e.g. [Block] or ['*Layer']. Smaller units lower the peak memory (one unit's full weights at a time),
    more units mean more, smaller collectives."""
    reshard_after_forward: bool = True
    """fsdp2: free each unit's gathered weights after its forward and gather them again for the backward
    (lowest memory); false keeps them from forward to backward (one all-gather fewer per unit and micro-step,
    more memory)."""
    reduce_every_micro_step: bool = False
    """fsdp2 with train.grad_accum_steps > 1: reduce-scatter the gradients after every micro-step's backward
    instead of once per optimizer step. false (default): the unsharded gradients accumulate locally over the
    window and are reduced once (K times less gradient communication, but each rank holds the full gradients of
    the model for the window). true: each rank only ever keeps its shard of the gradients (1/W of the memory),
    paying one reduce-scatter per micro-step. The numbers are the same either way."""
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
    fast links). DDP only: under fsdp2 each shard unit is one reduce-scatter."""
    static_graph: bool = False
    """Promise DDP that every step uses the same parameters in the same order (no data-dependent branches):
    after the first step it orders its buckets by when gradients are really ready and skips per-step
    bookkeeping. Helps models whose gradients arrive in another order than their parameters are declared; it
    also makes find_unused_parameters cheap. Wrong for models that skip layers depending on the input. DDP
    only: no effect under fsdp2."""
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
    need no flag. Refused with dist.strategy=fsdp2, whose ranks must all give the same parameters gradients."""


@dataclass
class LogConfig:
    """What rank 0 logs where: metrics.jsonl always, W&B and TensorBoard when asked, the console."""

    every_steps: int = 10
    """Log the train loss averaged over this many optimizer steps."""
    wandb: bool = False
    """Log to Weights & Biases (the wandb extra); W&B's own environment variables (WANDB_MODE, ...) apply."""
    project: Optional[str] = None
    """W&B project; unset leaves it to WANDB_PROJECT or W&B's default."""
    entity: Optional[str] = None
    """W&B entity (user or team); unset leaves it to WANDB_ENTITY or W&B's default."""
    run_name: Optional[str] = None
    """W&B run name; unset: W&B picks one."""
    tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    tensorboard: bool = False
    """Write TensorBoard event files under <output_dir>/tensorboard/."""
    progress: str = "auto"
    """auto (a bar when stdout is a terminal, lines otherwise) | bar | lines | none."""
    peak_tflops: Optional[float] = None
    """One device's peak, in TFLOP/s, against which train records report mfu (model FLOPs utilisation) for a
    model that says its FLOPs per token (model.name=gpt does). Unset: the dense bf16 peak of a known GPU, found
    by its name (H100 and H200 989, A100 312); for an unknown GPU or on a CPU no mfu is logged (and the run's
    start says so once)."""


@dataclass
class CheckpointConfig:
    """When checkpoints are saved and kept, what a stop signal does, and the best checkpoints."""

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
    monitor: Optional[str] = None
    """An eval value (loss, or a metric's name) by which to keep the best checkpoints as well as the newest:
    after each eval that ranks among the checkpoint.keep_best best so far, every rank saves a checkpoint, and
    rank 0 writes <output_dir>/model_best.pt (the best one's weights) and checkpoints/best.json (which
    checkpoint is best) atomically. Unset: only the newest checkpoint.keep are kept."""
    mode: str = "min"
    """min | max: whether a smaller or a larger checkpoint.monitor is better."""
    keep_best: int = 1
    """With checkpoint.monitor: how many of the best checkpoints stay, besides the checkpoint.keep newest;
    neither the newest nor a best one is ever deleted."""


@dataclass
class EvalConfig:
    """When the eval set is scored (always at each epoch's end when there is one), and on how much of it."""

    every_steps: Optional[int] = None
    """Evaluate every this many optimizer steps as well as at each epoch's end (an epoch of tens of thousands
    of steps is otherwise blind until it ends); unset: at epoch ends only. The trained weights are the same
    either way: an eval takes no randomness from the run."""
    max_batches: Optional[int] = None
    """Evaluate on the eval set's first max_batches x data.eval_batch_size samples only (a quick estimate, the
    same samples at any number of processes); unset: the whole set, every sample once."""


@dataclass
class EarlyStopConfig:
    """Finish the run once an eval value stops improving."""

    monitor: Optional[str] = None
    """Stop the run when this eval value (loss, or a metric's name) has not improved for early_stop.patience
    evaluations; the run then ends as finished (model.pt, finished.json), and a rerun says so. Decided from
    the global eval, so every rank stops at the same step. Unset: off."""
    mode: str = "min"
    """min | max: whether a smaller or a larger early_stop.monitor is better."""
    patience: int = 3
    """Evaluations without improvement tolerated before stopping."""
    min_delta: float = 0.0
    """How much better than the best so far a value must be to count as an improvement."""


@dataclass
class EmaConfig:
    """An exponential moving average of the weights."""

    decay: Optional[float] = None
    """Keep an exponential moving average of the weights, ema = decay * ema + (1 - decay) * weights, after each
    optimizer step that was applied (not one skipped by the fp16 GradScaler or train.on_nonfinite=skip).
    Evaluated with every eval (records of split eval_ema), kept in checkpoints and written as model_ema.pt.
    Costs one pass over the weights per step and one copy of them in memory. Unset: off."""


@dataclass
class CallbackConfig:
    """A user callback by import path, built on every rank (one item of the callbacks list)."""

    name: str = MISSING
    """A factory 'package.module:Name' returning a dtrain.Callback (a Callback subclass is a factory)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the factory."""


@dataclass
class LRFindConfig:
    """The learning-rate range test (python -m dtrain.lr_find); a training run ignores it."""

    start_lr: float = 1e-5
    """The lr of the test's first step."""
    end_lr: float = 10.0
    """The lr of its last step; the lr grows exponentially in between."""
    num_steps: int = 100
    """Optimizer steps of the test, unless the loss diverges first."""
    smoothing: float = 0.05
    """Weight of the newest loss in the exponential moving average."""
    diverge_factor: float = 4.0
    """Stop once the smoothed loss exceeds this multiple of the best one."""


@dataclass
class Config:
    """The whole run: one section per part, plus the callbacks and where the run writes."""

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
    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)
    """User callbacks, built on every rank and called after dtrain's own, in order, e.g.
    [{name: mypkg.callbacks:LogGradNorm, kwargs: {every: 10}}]; on the command line in YAML flow syntax:
    'callbacks=[{name: mypkg.callbacks:LogGradNorm}]'."""
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
