"""`python download_node.py <dtrain args>`: dtrain with torchvision's MNIST download replaced by a local writer.

Nothing leaves the machine: the "download" writes tiny IDX files (tests/tinydata.py)
where torchvision would put the real ones, after a pause so that a rank reading
too early would find them missing, and appends "<rank> <root>" to the file named
by DTRAIN_TEST_DOWNLOAD_LOG, so a test counts who downloaded where.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for tinydata

import torchvision  # noqa: E402

from tinydata import write_mnist  # noqa: E402


def fake_download(self: torchvision.datasets.MNIST) -> None:
    if self._check_exists():
        return
    time.sleep(1.0)
    write_mnist(Path(self.root), "mnist", n_train=40, n_test=10)
    with open(os.environ["DTRAIN_TEST_DOWNLOAD_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{os.environ.get('RANK', '0')} {os.path.abspath(self.root)}\n")


torchvision.datasets.MNIST.download = fake_download  # type: ignore[method-assign]

if __name__ == "__main__":
    from dtrain.__main__ import main

    sys.exit(main(sys.argv[1:]))
