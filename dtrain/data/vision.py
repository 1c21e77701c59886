"""MNIST, FashionMNIST and CIFAR-10 through torchvision's own dataset classes.

torchvision is an optional extra (`pip install dtrain[vision]`) and is
imported only when one of these datasets is asked for.

torchvision does all the reading and its own integrity checks (CIFAR-10's md5
table included); this module turns its failures into one line that says
which files are missing or bad and how to get them, and keeps the images
torchvision decoded as `NormalizedImages`, which the fast path batches whole.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import torch

from dtrain.data.types import Datasets
from dtrain.errors import DTrainError


@dataclass(frozen=True)
class VisionSpec:
    cls_name: str
    """The torchvision.datasets class."""
    folder: str
    """Where that class reads its files, relative to data.root (torchvision 0.17+ layout)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    by_hand: str
    """The alternative to data.download=true, for the error messages."""


# The statistics are the training sets' own per-channel mean and std of the
# [0, 1] pixels: the normalisation of the classic tutorials.
VISION: dict[str, VisionSpec] = {
    "mnist": VisionSpec("MNIST", os.path.join("MNIST", "raw"), (0.1307,), (0.3081,), (1, 28, 28),
                        "put the four uncompressed IDX files there"),
    "fashion_mnist": VisionSpec("FashionMNIST", os.path.join("FashionMNIST", "raw"), (0.2860,), (0.3530,),
                                (1, 28, 28), "put the four uncompressed IDX files there"),
    "cifar10": VisionSpec("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                          (3, 32, 32), "extract cifar-10-python.tar.gz into data.root"),
}

# What torchvision raises on files that exist but cannot be parsed: the IDX
# reader asserts on bad headers and fails `view` on truncated data; pickles
# raise their own errors. Anything else is a bug, and keeps its traceback.
_UNREADABLE = (RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError, KeyError,
               pickle.UnpicklingError)


def _import_torchvision(name: str) -> Any:
    try:
        import torchvision
        import torchvision.transforms  # noqa: F401  (a submodule: not loaded by `import torchvision` alone)
    except ImportError:
        raise DTrainError(f"data.name={name} needs torchvision: pip install 'dtrain[vision]'") from None
    except (RuntimeError, OSError) as exc:
        # Typically a torchvision built for another torch ("operator torchvision::nms does not exist").
        raise DTrainError(f"data.name={name}: torchvision is installed but fails to import "
                          f"({_one_line(exc)}); install the torchvision build that matches torch") from None
    return torchvision


def _one_line(exc: BaseException, limit: int = 300) -> str:
    # torchvision's download errors span lines ("Error downloading X:\nTried M, got:\n<cause>");
    # the cause is on the last one, so join rather than keep the first.
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def expected_files(cls: Any) -> list[tuple[str, Optional[str]]]:
    """(file name, md5 or None) that `cls` reads, taken from the class itself.

    MNIST-style classes list their downloads as `resources` (.gz archives) and
    read the extracted files without checking sums; CIFAR lists the files with
    the md5 sums it checks.
    """
    if hasattr(cls, "train_list"):
        return [(f, md5) for f, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
    return [(os.path.splitext(os.path.basename(url))[0], None) for url, _ in cls.resources]


def _diagnose(spec: VisionSpec, cls: type, where: str, exc: BaseException) -> str:
    from torchvision.datasets.utils import check_integrity

    fix = (f"run once with data.download=true (needs internet), or {spec.by_hand}, "
           "or set data.root to where the files are")
    if not os.path.isdir(where):
        return f"{spec.cls_name} files not found: {where} does not exist; {fix}"
    files = expected_files(cls)
    missing = [f for f, _ in files if not os.path.isfile(os.path.join(where, f))]
    if missing:
        zipped = [f for f in missing if os.path.isfile(os.path.join(where, f + ".gz"))]
        hint = f" (found {', '.join(f + '.gz' for f in zipped)}: gunzip them)" if zipped else ""
        return f"{spec.cls_name} files not found under {where}: missing {', '.join(missing)}{hint}; {fix}"
    corrupt = [f for f, md5 in files if md5 is not None and not check_integrity(os.path.join(where, f), md5)]
    if corrupt:
        return (f"{spec.cls_name} files under {where} are corrupted (md5 mismatch: {', '.join(corrupt)}); "
                f"delete them and {fix}")
    return f"{spec.cls_name} files under {where} cannot be read ({_one_line(exc)}); replace them: {fix}"


def download_files(name: str, root: str) -> None:
    """Let torchvision fetch whatever of `name` is missing under `root` (a no-op when all is there).

    Returns nothing, so `DistState.run_on_main` broadcasts nothing big to the other ranks.
    """
    torchvision = _import_torchvision(name)
    spec = VISION[name]
    cls = getattr(torchvision.datasets, spec.cls_name)
    root = os.path.expanduser(root)
    try:
        for train in (True, False):
            cls(root, train=train, download=True)
    except (RuntimeError, OSError) as exc:  # URLError and HTTPError are OSErrors
        raise DTrainError(f"downloading {spec.cls_name} into {os.path.join(root, spec.folder)} failed "
                          f"({_one_line(exc)}); check the internet connection, or {spec.by_hand} "
                          "and set data.download=false") from None


def vision_datasets(name: str, root: str) -> Datasets:
    """Train and eval splits of `name` under `root`; DTrainError, one line, on missing or bad files."""
    torchvision = _import_torchvision(name)
    from torchvision import transforms

    spec = VISION[name]
    cls = getattr(torchvision.datasets, spec.cls_name)
    root = os.path.expanduser(root)
    where = os.path.join(root, spec.folder)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    try:
        train_set = cls(root, train=True, transform=tf, download=False)
        eval_set = cls(root, train=False, transform=tf, download=False)
    except _UNREADABLE as exc:
        # Diagnosed only after torchvision failed, never checked up front:
        # MNIST also loads from the legacy processed/*.pt files without raw/.
        raise DTrainError(_diagnose(spec, cls, where, exc)) from None
    return Datasets(_decoded(train_set, spec), _decoded(eval_set, spec), spec.input_shape, 10)


def _decoded(ds: Any, spec: VisionSpec) -> Any:
    """The images torchvision has decoded, as NormalizedImages: the same samples, and batches for the fast
    path (dtrain/data/batches.py)."""
    return NormalizedImages(torch.as_tensor(ds.data), torch.as_tensor(ds.targets), spec.mean, spec.std,
                            list(ds.classes))


class NormalizedImages:
    """Decoded uint8 images and their labels, normalised per batch exactly as ToTensor + Normalize per image.

    For dtrain's MNIST, FashionMNIST and CIFAR-10: torchvision keeps every
    image decoded in memory (uint8), and its per-image pipeline is a layout
    change, a float32 division by 255, then a subtraction of the channel mean
    and a division by the channel std, each in float32. The same element-wise
    operations on a whole batch give the same bytes, so `get_batch` equals
    collating `__getitem__`, which equals torchvision's own items.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: tuple[float, ...],
                 std: tuple[float, ...], classes: Optional[list[str]] = None) -> None:
        self.images = images if images.dim() == 4 else images[..., None]
        """uint8, (N, H, W, C)."""
        self.targets = targets.to(torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def _normalise(self, hwc: torch.Tensor) -> torch.Tensor:
        chw = hwc.movedim(-1, -3).contiguous()
        return chw.to(torch.float32).div(255).sub(self.mean).div(self.std)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._normalise(self.images[i]), int(self.targets[i])

    def get_batch(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return [self._normalise(self.images.index_select(0, indices)), self.targets.index_select(0, indices)]
