"""Fixtures every test gets: a clean environment and no process group left behind."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def clean_environment():
    """Restore os.environ after each test and drop launcher/Slurm variables before it.

    A test run inside a Slurm allocation or under torchrun must not see its
    own launcher; a test that sets variables must not leak them.
    """
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith("SLURM_"):
            del os.environ[key]
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
