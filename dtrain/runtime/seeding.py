"""Seeds: one for what every rank must share, one per rank for what must differ.

The initial weights come from `train.seed` itself, identical on every rank.
Everything random after that (dropout masks, DataLoader worker seeds and so
random augmentations) draws from a per-rank seed, or the W ranks would apply
the same mask at the same batch position and the global batch would hold W
times less randomness than its size suggests. The per-rank seed is a hash of
(seed, rank, world size): the same run after run, independent across ranks.
"""

from __future__ import annotations

import hashlib
import random
import sys

import torch


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    digest = hashlib.sha256(f"dtrain:{seed}:{rank}:{world_size}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """torch (CPU and every CUDA device), Python's `random`, and numpy's global RNG if numpy is loaded."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def rng_state(loader_generator: torch.Generator) -> dict:
    """This rank's random state, as tensors and plain numbers (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    state: dict = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
                   "loader": loader_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own device only: a resumed job may see fewer GPUs per process.
        state["cuda"] = torch.cuda.get_rng_state()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
