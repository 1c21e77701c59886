"""Which device this process trains on and which collective backend goes with it."""

from __future__ import annotations

from typing import Optional

import torch

from dtrain.errors import ConfigError, DTrainError


def resolve_device(requested: str, local_rank: Optional[int]) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device", requested, "auto | cpu (no CUDA device is visible)")
    count = torch.cuda.device_count()
    if count == 1:
        # One GPU visible per task (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set
        # per rank): whatever this task's local rank, that GPU is its own.
        return torch.device("cuda", 0)
    if local_rank is None:
        # RANK/WORLD_SIZE by hand without LOCAL_RANK: on a node with several GPUs,
        # guessing cuda:RANK binds rank 5 of a 4-per-node job to another job's GPU.
        raise DTrainError(f"{count} GPUs are visible but the launch does not say which is this process's: "
                          "set LOCAL_RANK (or LOCAL_WORLD_SIZE, the processes per node), or launch with torchrun")
    if local_rank >= count:
        raise DTrainError(f"local rank {local_rank} has no GPU: only {count} visible on this node; "
                          "start at most one process per GPU")
    return torch.device("cuda", local_rank)


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend", requested, "gloo | auto on CPU (NCCL needs CUDA)")
    return requested
