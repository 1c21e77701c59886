"""Tiny MNIST/FashionMNIST/CIFAR-10 files in the real on-disk formats, so torchvision's own readers run.

Pixels and labels come from a seeded generator and are returned, so tests can
compute the expected tensors independently of torchvision.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# torchvision's (0.17+) folder and file names; the legacy processed/*.pt layout is not written.
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# IDX magic numbers: 0x08 = unsigned byte, then the number of dimensions.
IDX_UBYTE_3D = 0x00000803
IDX_UBYTE_1D = 0x00000801


@dataclass
class Split:
    images: np.ndarray
    """uint8, (N, H, W) for MNIST, (N, H, W, C) for CIFAR: the layout torchvision hands to PIL."""
    labels: np.ndarray
    """int64, (N,)."""


@dataclass
class Tiny:
    root: Path
    """What to pass as data.root."""
    folder: Path
    """Where the files are."""
    train: Split
    test: Split
    md5: dict[str, str]
    """File name -> md5 of what was written."""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _split(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> Split:
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    # Every class present, then random: label checks see all ten values.
    labels = np.concatenate([np.arange(min(n, 10)), rng.integers(0, 10, size=max(n - 10, 0))]).astype(np.int64)
    return Split(images, labels)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", IDX_UBYTE_3D, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", IDX_UBYTE_1D, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str = "mnist", n_train: int = 64, n_test: int = 20, seed: int = 0) -> Tiny:
    """ROOT/{MNIST,FashionMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed."""
    rng = np.random.default_rng(seed)
    folder = root / MNIST_FOLDERS[name] / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = _split(rng, n_train, (28, 28)), _split(rng, n_test, (28, 28))
    for prefix, split in (("train", train), ("t10k", test)):
        write_idx_images(folder / f"{prefix}-images-idx3-ubyte", split.images)
        write_idx_labels(folder / f"{prefix}-labels-idx1-ubyte", split.labels)
    return Tiny(root, folder, train, test, {p.name: _md5(p) for p in folder.iterdir()})


def _write_pickle(path: Path, obj: dict) -> None:
    # Protocol 2, as the original Python 2 pickles; torchvision reads them with encoding="latin1".
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, n_train: int = 64, n_test: int = 20, seed: int = 0) -> Tiny:
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, python pickles."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train, test = _split(rng, n_train, (32, 32, 3)), _split(rng, n_test, (32, 32, 3))

    def rows(images: np.ndarray) -> np.ndarray:
        # A row is the 1024 red, then green, then blue values, each plane row-major.
        return images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)

    for i, idx in enumerate(np.array_split(np.arange(n_train), len(CIFAR_TRAIN_FILES))):
        _write_pickle(folder / CIFAR_TRAIN_FILES[i], {
            "batch_label": f"training batch {i + 1} of 5", "labels": train.labels[idx].tolist(),
            "data": rows(train.images[idx]), "filenames": [f"img_{j}.png" for j in idx]})
    _write_pickle(folder / CIFAR_TEST_FILE, {
        "batch_label": "testing batch 1 of 1", "labels": test.labels.tolist(), "data": rows(test.images),
        "filenames": [f"test_{j}.png" for j in range(n_test)]})
    _write_pickle(folder / CIFAR_META_FILE, {"label_names": CIFAR_CLASSES, "num_cases_per_batch": 10000,
                                             "num_vis": 3072})
    return Tiny(root, folder, train, test, {p.name: _md5(p) for p in folder.iterdir()})


def cifar10_checksum_tables(tiny: Tiny) -> tuple[list[list[str]], list[list[str]], dict[str, str]]:
    """CIFAR10.train_list, test_list and meta as torchvision spells them, with the tiny files' md5s."""
    train_list = [[f, tiny.md5[f]] for f in CIFAR_TRAIN_FILES]
    test_list = [[CIFAR_TEST_FILE, tiny.md5[CIFAR_TEST_FILE]]]
    meta = {"filename": CIFAR_META_FILE, "key": "label_names", "md5": tiny.md5[CIFAR_META_FILE]}
    return train_list, test_list, meta
