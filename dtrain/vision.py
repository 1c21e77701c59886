"""MNIST, FashionMNIST and CIFAR-10 through torchvision's own dataset classes.

torchvision is an optional extra (`pip install dtrain[vision]`) and is
imported only when one of these datasets is asked for.
"""

from __future__ import annotations

import os

from dtrain.errors import DTrainError

# (torchvision class name, folder torchvision expects under data.root,
#  per-channel mean, per-channel std, input shape). The statistics are the
#  training sets' own, the normalisation used in the classic tutorials.
VISION = {
    "mnist": ("MNIST", "MNIST/raw", (0.1307,), (0.3081,), (1, 28, 28)),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", (0.2860,), (0.3530,), (1, 28, 28)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32)),
}


def vision_datasets(name: str, root: str, download: bool):  # -> dtrain.data.Datasets
    try:
        import torchvision
        from torchvision import transforms
    except ImportError:
        raise DTrainError(f"data.name={name} needs torchvision: pip install 'dtrain[vision]'") from None
    from dtrain.data import Datasets

    cls_name, folder, mean, std, shape = VISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        train = cls(root, train=True, transform=tf, download=download)
        eval_ = cls(root, train=False, transform=tf, download=download)
    except RuntimeError as exc:
        if "not found" not in str(exc) and "corrupted" not in str(exc):
            raise
        where = os.path.join(root, folder)
        raise DTrainError(
            f"{cls_name} files not found or corrupted under {where}; run once with data.download=true "
            f"(needs internet), or copy the dataset there, or point data.root at it") from None
    return Datasets(train, eval_, shape, 10)
