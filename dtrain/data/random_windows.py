"""data.sampling=random: each step's windows at random offsets, a function of (seed, epoch, step, place in the
global batch) alone, nanoGPT's sampler made exact across processes and resumes.

A step trains on G = batch_size x grad_accum_steps x world_size windows. Every
rank draws the same G offsets from a generator seeded by (train.seed, epoch,
step in the epoch), and reads its own contiguous share: rank r's micro-batch j
is offsets[(r*K + j)*B : (r*K + j + 1)*B]. So the global batch is the same set
of windows at any split of G into ranks, micro-batches and batch size, and a
resumed run draws what the interrupted one would have drawn from the window
index the checkpoint saved; no sampler state is kept beyond it.

An epoch here is a length, not a pass: as many steps as it takes to draw
(tokens - 1) // block_size windows (what one pass of strided windows holds),
so train.epochs, the schedules and eval at epoch ends count as for any data.
Windows are drawn with replacement: some are seen twice in an epoch, some not.
"""

from __future__ import annotations

import math
import time
from typing import Any, Generator, Mapping

import numpy as np
import torch

from dtrain.data.source import Window
from dtrain.data.tokens import TokenWindows


def draw_offsets(seed: int, epoch: int, step: int, count: int, offsets: int) -> np.ndarray:
    """The `count` window offsets (int64, each in [0, offsets)) of step `step` of `epoch`: the global batch."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, step])))
    return rng.integers(0, offsets, size=count, dtype=np.int64)


class RandomWindows:
    """A TrainSource over a TokenWindows: `k` micro-batches of `batch_size` random windows per step."""

    def __init__(self, data: TokenWindows, seed: int, rank: int, world_size: int, batch_size: int, k: int,
                 workers_rng: torch.Generator) -> None:
        self.data, self.seed = data, seed
        self.batch_size, self.k = batch_size, k
        self.workers_rng = workers_rng  # no workers here; a checkpoint saves it all the same
        self.global_batch = batch_size * k * world_size
        self.first = rank * k * batch_size
        """Where this rank's share starts in the global batch."""
        self.steps_per_epoch = max(1, math.ceil(len(data) / self.global_batch))
        self.position = 0

    def windows(self, epoch: int) -> Generator[Window, None, None]:
        try:
            for index in range(self.position, self.steps_per_epoch):
                t = time.perf_counter()
                mine = self.offsets(epoch, index)
                batches = [self.data.at(mine[j:j + self.batch_size]) for j in range(0, len(mine), self.batch_size)]
                fetch_s = time.perf_counter() - t
                # Counted before the window is handed out: a checkpoint taken after its step resumes after it.
                self.position = index + 1
                yield Window(batches, [self.batch_size] * self.k, self.global_batch, fetch_s, index)
        finally:
            self.position = 0  # run out, or closed early by max_steps: the next epoch starts at its beginning

    def offsets(self, epoch: int, index: int) -> np.ndarray:
        """This rank's share of the offsets of window `index` of `epoch`: its k micro-batches, one after another."""
        drawn = draw_offsets(self.seed, epoch, index, self.global_batch, self.data.offsets)
        return drawn[self.first:self.first + self.k * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"window_in_epoch": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["window_in_epoch"])
