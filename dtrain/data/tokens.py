"""data.name=tokens: token ids in nanoGPT's layout, memory-mapped, read as windows of data.block_size.

A folder holds `train.bin` and `val.bin` (raw ids of data.token_dtype, nanoGPT's
uint16 by default) or `train.npy` and `val.npy` (which say their own dtype), and
an optional `meta.pkl` whose `vocab_size` is the vocabulary; without one, the
vocabulary is the largest id + 1, found by one pass over the files at set-up.

A sample is a window: x = ids[o : o+T] and y = ids[o+1 : o+T+1] (the targets
are the inputs shifted by one, nanoGPT's convention), both int64 [T]. A batch
of windows is one fancy index of the memmap with a [B, T+1] matrix of
positions, never B reads: `TokenWindows.get_batch` makes the strided windows a
`BatchedDataset` (the fast path of dtrain/data/batches.py, sharded and resumed
by the usual sampler), and `TokenWindows.at` serves the random offsets of
dtrain/data/random_windows.py.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from dtrain.config import DataConfig
from dtrain.data.types import Datasets
from dtrain.errors import DTrainError

SPLITS = {"train": "train", "eval": "val"}
"""The file stem of each role: nanoGPT names its eval split val."""
HOW_TO_GET = ("data.download=true writes tiny Shakespeare there (encoded as characters), or write your own ids "
              "(see docs/guides/language-models.md)")


@dataclass(frozen=True)
class TokenFile:
    """Where a split's ids are and how to read them: enough to open the memmap again in another process."""

    path: str
    dtype: str
    npy: bool

    def open(self) -> np.ndarray:
        if self.npy:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.memmap(self.path, dtype=self.dtype, mode="r")


def _find(folder: str, stem: str) -> Optional[str]:
    for ext in (".bin", ".npy"):
        path = os.path.join(folder, stem + ext)
        if os.path.exists(path):
            return path
    return None


def open_token_file(path: str, dtype: str, block_size: int) -> tuple[TokenFile, np.ndarray]:
    """The file's ids, memory-mapped and checked: whole ids of an integer type, at least one window of them."""
    npy = path.endswith(".npy")
    if npy:
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DTrainError(f"data.path: {path} is not a readable .npy array ({' '.join(str(exc).split())})") \
                from None
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise DTrainError(f"data.path: {path} holds a {ids.dtype} array of shape {tuple(ids.shape)}; expected "
                              "one dimension of integer token ids")
        dtype = str(ids.dtype)
    else:
        size, item = os.path.getsize(path), np.dtype(dtype).itemsize
        if size % item:
            raise DTrainError(f"data.path: {path} is {size} bytes, not a whole number of {dtype} ids ({item} bytes "
                              "each); is data.token_dtype right?")
        ids = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    if len(ids) < block_size + 1:
        raise DTrainError(f"data.path: {path} holds {len(ids)} tokens, fewer than one window of "
                          f"data.block_size={block_size} needs ({block_size + 1}: the inputs and the next token)")
    return TokenFile(path, dtype, npy), ids


class _PlainData(pickle.Unpickler):
    """Reads dicts, lists, strings and numbers; refuses any class, so a meta.pkl cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def read_vocab_size(path: str) -> int:
    """meta.pkl's vocab_size, read as plain data only."""
    try:
        with open(path, "rb") as f:
            meta = _PlainData(f).load()
    except Exception as exc:  # noqa: BLE001 - a damaged or hostile pickle fails in many ways: one line each
        raise DTrainError(f"data.path: cannot read {path} as plain data ({' '.join(str(exc).split())}); dtrain "
                          "reads only dicts, lists, strings and numbers from it") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise DTrainError(f"data.path: {path} has no integer vocab_size >= 1 (found {vocab!r}); remove the file to "
                          "take the largest id + 1")
    return vocab


class TokenWindows(Dataset):
    """The non-overlapping windows of a token file as samples; `at` reads windows at any offsets in one gather.

    `vocab_size`: every gathered id is checked to be below it (on the host, a max over the batch's ids),
    so a file that does not fit its meta.pkl is one line instead of an index error in the embedding.
    """

    def __init__(self, file: TokenFile, ids: np.ndarray, block_size: int, vocab_size: Optional[int] = None) -> None:
        self.file, self.ids, self.block_size, self.vocab_size = file, ids, block_size, vocab_size
        self.span = np.arange(block_size + 1, dtype=np.int64)
        self.tokens = len(ids)

    def __len__(self) -> int:
        return (self.tokens - 1) // self.block_size

    @property
    def offsets(self) -> int:
        """How many offsets a window can start at: 0 .. tokens - block_size - 1."""
        return self.tokens - self.block_size

    def at(self, offsets: np.ndarray) -> list[torch.Tensor]:
        """[x, y] of the windows starting at `offsets` (int64 [B]): x [B, T] and y, x shifted by one."""
        chunk = self.ids[offsets[:, None] + self.span]  # one gather of [B, T+1] ids
        if self.vocab_size is not None and chunk.size:
            top = int(chunk.max())
            if top >= self.vocab_size:
                raise DTrainError(f"data.path: {self.file.path} holds token id {top}, at or beyond the vocabulary "
                                  f"of {self.vocab_size} its meta.pkl gives; fix the ids or meta.pkl's vocab_size")
        both = torch.from_numpy(chunk.astype(np.int64))
        return [both[:, :-1].contiguous(), both[:, 1:].contiguous()]

    def get_batch(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """What collating windows `indices` would give (the `BatchedDataset` protocol)."""
        return self.at(indices.cpu().numpy().astype(np.int64) * self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        x, y = self.at(np.array([index * self.block_size], dtype=np.int64))
        return x[0], y[0]

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker started by spawn opens the file again instead of receiving its bytes.
        state = dict(self.__dict__)
        del state["ids"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.ids = self.file.open()


def token_datasets(cfg: DataConfig) -> Datasets:
    """The train windows, the eval windows (none without a val file) and the vocabulary, from data.path."""
    folder = os.path.expanduser(cfg.path)
    train_path = _find(folder, SPLITS["train"])
    if train_path is None:
        raise DTrainError(f"data.path={cfg.path}: no train.bin or train.npy there; {HOW_TO_GET}")
    opened = {"train": open_token_file(train_path, cfg.token_dtype, cfg.block_size)}
    eval_path = _find(folder, SPLITS["eval"])
    if eval_path is not None:
        opened["eval"] = open_token_file(eval_path, cfg.token_dtype, cfg.block_size)
    meta = os.path.join(folder, "meta.pkl")
    checked: Optional[int] = None
    if os.path.exists(meta):
        vocab = checked = read_vocab_size(meta)
    else:
        vocab = max(int(ids.max()) for _, ids in opened.values()) + 1  # one pass over each file, once per run
    windows = {role: TokenWindows(file, ids, cfg.block_size, checked) for role, (file, ids) in opened.items()}
    return Datasets(windows["train"], windows.get("eval"), (cfg.block_size,), vocab)
