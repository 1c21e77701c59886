"""The typed, validated config: its schema, the YAML files it reads and writes, the overrides on top, and what
a resume may change. Imports nothing of dtrain but `errors` (and no torch), so a bad key fails before anything
heavy loads."""

from dtrain.config.choices import (BACKENDS, CATCHABLE_SIGNALS, DATASETS, DEVICES, GENERATED_DATASETS,
                                   GRAD_COMPRESSIONS, LOSSES, METRICS, MODEL_INITS, MODELS, ON_NONFINITE, OPTIMIZERS,
                                   PRECISIONS, PROGRESS, SCHEDULES)
from dtrain.config.compat import RESUME_FREE, resume_conflicts
from dtrain.config.load import ConfigFileError, load_config, read_config_file, to_dict, to_yaml
from dtrain.config.schema import (CheckpointConfig, Config, DataConfig, DistConfig, LogConfig, LossConfig,
                                  LRFindConfig, ModelConfig, OptimConfig, ParamGroupConfig, SchedConfig, TrainConfig,
                                  global_batch)
from dtrain.config.validate import validate
from dtrain.errors import ConfigError

__all__ = [
    "BACKENDS", "CATCHABLE_SIGNALS", "DATASETS", "DEVICES", "GENERATED_DATASETS", "GRAD_COMPRESSIONS", "LOSSES",
    "METRICS", "MODEL_INITS", "MODELS", "ON_NONFINITE", "OPTIMIZERS", "PRECISIONS", "PROGRESS", "SCHEDULES",
    "RESUME_FREE", "resume_conflicts",
    "ConfigError", "ConfigFileError", "load_config", "read_config_file", "to_dict", "to_yaml", "validate",
    "CheckpointConfig", "Config", "DataConfig", "DistConfig", "LogConfig", "LossConfig", "LRFindConfig", "ModelConfig",
    "OptimConfig", "ParamGroupConfig", "SchedConfig", "TrainConfig", "global_batch",
]
