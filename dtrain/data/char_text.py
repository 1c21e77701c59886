"""data.name=tokens with data.download=true: tiny Shakespeare, fetched once and encoded as characters.

`encode_chars` turns a text into nanoGPT's shakespeare_char layout: the sorted
set of its characters is the vocabulary (meta.pkl: vocab_size, stoi, itos),
the first 90% of the text is train.bin and the rest val.bin, uint16 ids. Each
file is written whole or not at all, train.bin last, so a folder with a
train.bin is a finished one and an interrupted preparation is simply redone.
The fetch is separate (`fetch_text`): the encoding is the same for any text.
"""

from __future__ import annotations

import os
import pickle
import urllib.request
from typing import Callable

import numpy as np

from dtrain.errors import DTrainError
from dtrain.runtime.files import write_atomic

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TRAIN_FRACTION = 0.9
FETCH_TIMEOUT_S = 60


def encode_chars(text: str, folder: str) -> int:
    """Write train.bin, val.bin and meta.pkl of `text` into `folder`; the vocabulary size."""
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1 or len(text) < 2:
        raise DTrainError(f"cannot encode a text of {len(text)} characters, {len(chars)} distinct, as uint16 "
                          "character ids")
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(ids) * TRAIN_FRACTION)
    os.makedirs(folder, exist_ok=True)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    write_atomic(os.path.join(folder, "meta.pkl"), pickle.dumps(meta))
    write_atomic(os.path.join(folder, "val.bin"), ids[cut:].tobytes())
    write_atomic(os.path.join(folder, "train.bin"), ids[:cut].tobytes())
    return len(chars)


def fetch_text(url: str = SHAKESPEARE_URL, timeout_s: float = FETCH_TIMEOUT_S) -> str:
    """The text at `url`; a failure is one line saying what to do instead."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8")
    except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
        raise DTrainError(f"data.download: cannot fetch tiny Shakespeare from {url} ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); download it elsewhere and set data.path to a folder "
                          "with its train.bin, val.bin and meta.pkl") from None


def prepare_shakespeare(folder: str, fetch: Callable[[], str] = fetch_text) -> None:
    """tiny Shakespeare as characters in `folder`, unless a train file is there already."""
    if any(os.path.exists(os.path.join(folder, f"train{ext}")) for ext in (".bin", ".npy")):
        return
    encode_chars(fetch(), folder)
