"""The names each config choice accepts, defined once.

`validate` checks a config against these; the code that implements a choice dispatches on the same tuple and
spells it in its own messages (a model factory's "allowed: mlp | cnn | ..."), so a new choice is one entry here
plus its implementation. Plain tuples: loading a config imports no torch.
"""

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "tokens")
SAMPLINGS = ("random", "strided")
TOKEN_DTYPES = ("uint16", "uint32")
GENERATED_DATASETS = ("digits", "synthetic")
"""Built in memory, from scikit-learn's bundled digits or a seeded generator: nothing to download."""
MODELS = ("mlp", "cnn", "gpt")
MODEL_INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
LOSSES = ("cross_entropy", "causal_lm", "mse", "l1", "smooth_l1", "bce_with_logits")
METRICS = ("accuracy", "mae")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip", "ignore")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
STRATEGIES = ("ddp", "fsdp2")
"""How 2 or more processes share the model (dtrain/parallel/: one module each, registered by this name)."""
GRAD_COMPRESSIONS = ("none", "bf16", "fp16")
PROGRESS = ("auto", "bar", "lines", "none")
CATCHABLE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT", "SIGXCPU")
MONITOR_MODES = ("min", "max")
